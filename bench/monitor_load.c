/*
 * monitor_load: a Channel Access monitor load that costs almost nothing per event.
 *
 *     monitor_load SECONDS CONTEXTS < pvnames.txt
 *
 * Starts CONTEXTS threads. Each creates its own CA client context (so the server sees CONTEXTS
 * clients, each with its own TCP circuit), connects to every PV named on stdin (one per line),
 * subscribes to DBR_TIME_DOUBLE with the native element count and DBE_VALUE | DBE_ALARM, and counts
 * the events in its callback. After SECONDS, measured from when every context has subscribed, it
 * prints one line of JSON to stdout:
 *
 *     {"contexts": N, "pvs": M, "connected": C, "seconds": S, "events": E, "events_per_s": R,
 *      "per_context_per_s": [...]}
 *
 * "connected" is the minimum over the contexts; "events" counts only the events that arrived in
 * the measured window (the initial value every new subscription brings is not in it). SIGTERM or
 * SIGINT ends the run early and still prints the JSON. Progress and errors go to stderr.
 *
 * Exit status: 0 when all channels connected in every context, 2 when some did not, 1 on bad usage
 * or when a thread could not be started.
 *
 * Addresses come from the usual EPICS_CA_* environment variables.
 *
 * When no CA repeater listens on EPICS_CA_REPEATER_PORT, this process runs one in a thread of its
 * own before it creates the contexts. Otherwise every context would try to spawn a caRepeater
 * process at once (fork from a busy multithreaded program; a detached process that outlives the
 * run when caRepeater is on PATH, or else a pile of in-process repeater threads of which all but one
 * exit at once, which libCom's task watchdog then reports as "Thread ... suspended").
 */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cadef.h>
#include <caProto.h>
#include <envDefs.h>
#include <epicsThread.h>

/* libca's repeater loop (exported from libca, declared only in its private headers). */
void caRepeaterThread(void *unused);

#define CONNECT_TIMEOUT 10.0 /* seconds for all channels of one context to connect */
#define POLL_SECONDS 0.05    /* how often a connecting context looks at its channels */

struct context {
    int index;
    pthread_t thread;
    chid *channels;
    evid *subscriptions;
    int connected;        /* set by the context's own thread before it reports ready */
    int failed;           /* the CA context could not be created */
    unsigned long events; /* written by libca's callback thread: atomics only */
};

static char **names;
static int n_names;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int n_ready;   /* contexts that have subscribed (or given up); under lock */
static int stopping;  /* tells the contexts to clean up; under lock */
static int stop_flag; /* the same, read without the lock while connecting: atomics only */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* 1 when something holds the CA repeater port, tested the way libca tests it (bind without reuse). */
static int repeater_port_taken(unsigned short port)
{
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    if (sock < 0)
        return 0;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons(port);
    int taken = bind(sock, (struct sockaddr *)&addr, sizeof addr) != 0 && errno == EADDRINUSE;
    close(sock);
    return taken;
}

/* Make sure a CA repeater runs before the contexts look for one (see the top of this file). */
static void ensure_repeater(void)
{
    unsigned short port = envGetInetPortConfigParam(&EPICS_CA_REPEATER_PORT, (unsigned short)CA_REPEATER_PORT);
    if (repeater_port_taken(port))
        return;
    if (!epicsThreadCreate("CAC-repeater", epicsThreadPriorityLow, epicsThreadGetStackSize(epicsThreadStackMedium),
                           caRepeaterThread, NULL)) {
        fprintf(stderr, "could not start a CA repeater thread\n");
        return;
    }
    /* The thread binds within microseconds; test only after a pause, as a test bind that came first
       would make the repeater give up. */
    for (int i = 0; i < 50; i++) {
        epicsThreadSleep(0.02);
        if (repeater_port_taken(port))
            return;
    }
    fprintf(stderr, "warning: the CA repeater thread did not take port %u\n", port);
}

static void on_event(struct event_handler_args args)
{
    struct context *ctx = args.usr;
    if (args.status == ECA_NORMAL)
        __atomic_fetch_add(&ctx->events, 1, __ATOMIC_RELAXED);
}

static void report_ready(void)
{
    pthread_mutex_lock(&lock);
    n_ready++;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void *run_context(void *arg)
{
    struct context *ctx = arg;
    int status = ca_context_create(ca_enable_preemptive_callback);
    if (status != ECA_NORMAL) {
        fprintf(stderr, "context %d: ca_context_create: %s\n", ctx->index, ca_message(status));
        ctx->failed = 1;
        report_ready();
        return NULL;
    }

    for (int i = 0; i < n_names; i++) {
        status = ca_create_channel(names[i], NULL, NULL, CA_PRIORITY_DEFAULT, &ctx->channels[i]);
        if (status != ECA_NORMAL) {
            fprintf(stderr, "context %d: ca_create_channel %s: %s\n", ctx->index, names[i], ca_message(status));
            ctx->channels[i] = NULL;
        }
    }
    ca_flush_io();

    /* Like ca_pend_io(CONNECT_TIMEOUT), but a SIGTERM need not wait for the timeout. With preemptive
       callbacks the channels connect in libca's own threads while this one sleeps. */
    double deadline = now() + CONNECT_TIMEOUT;
    int connected = 0;
    while (!__atomic_load_n(&stop_flag, __ATOMIC_RELAXED)) {
        connected = 0;
        for (int i = 0; i < n_names; i++)
            if (ctx->channels[i] && ca_state(ctx->channels[i]) == cs_conn)
                connected++;
        if (connected == n_names || now() >= deadline)
            break;
        ca_pend_event(POLL_SECONDS);
    }

    for (int i = 0; i < n_names; i++) {
        ctx->subscriptions[i] = NULL;
        if (!ctx->channels[i] || ca_state(ctx->channels[i]) != cs_conn)
            continue;
        status = ca_create_subscription(DBR_TIME_DOUBLE, 0, ctx->channels[i], DBE_VALUE | DBE_ALARM, on_event, ctx,
                                        &ctx->subscriptions[i]);
        if (status != ECA_NORMAL) {
            fprintf(stderr, "context %d: ca_create_subscription %s: %s\n", ctx->index, names[i],
                    ca_message(status));
            ctx->subscriptions[i] = NULL;
        }
    }
    ca_flush_io();
    ctx->connected = connected;
    if (connected < n_names)
        fprintf(stderr, "context %d: %d of %d channels connected\n", ctx->index, connected, n_names);
    report_ready();

    pthread_mutex_lock(&lock);
    while (!stopping)
        pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);

    for (int i = 0; i < n_names; i++)
        if (ctx->subscriptions[i])
            ca_clear_subscription(ctx->subscriptions[i]);
    for (int i = 0; i < n_names; i++)
        if (ctx->channels[i])
            ca_clear_channel(ctx->channels[i]);
    ca_flush_io();
    ca_context_destroy();
    return NULL;
}

static int read_names(FILE *in)
{
    char *line = NULL;
    size_t size = 0;
    int capacity = 0;
    while (getline(&line, &size, in) >= 0) {
        char *start = line, *end = line + strlen(line);
        while (*start == ' ' || *start == '\t')
            start++;
        while (end > start && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t'))
            end--;
        if (end == start)
            continue;
        if (n_names == capacity) {
            capacity = capacity ? 2 * capacity : 256;
            names = realloc(names, (size_t)capacity * sizeof *names);
            if (!names)
                return -1;
        }
        if (!(names[n_names++] = strndup(start, (size_t)(end - start))))
            return -1;
    }
    free(line);
    return 0;
}

/* Wait for SIGTERM/SIGINT (blocked in every thread) for at most `seconds`; 1 when one came. */
static int wait_for_signal(const sigset_t *signals, double seconds)
{
    double deadline = now() + seconds;
    for (double left = seconds; left > 0; left = deadline - now()) {
        struct timespec timeout = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        if (sigtimedwait(signals, NULL, &timeout) > 0)
            return 1;
        if (errno == EAGAIN)
            return 0;
        /* EINTR: some other signal came; wait for the rest of the period */
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SECONDS CONTEXTS < pvnames.txt\n", argv[0]);
        return 1;
    }
    double seconds = atof(argv[1]);
    int n_contexts = atoi(argv[2]);
    if (!(seconds > 0) || n_contexts < 1) {
        fprintf(stderr, "SECONDS must be > 0 and CONTEXTS >= 1\n");
        return 1;
    }
    if (read_names(stdin) != 0) {
        fprintf(stderr, "out of memory reading PV names\n");
        return 1;
    }
    if (n_names == 0)
        fprintf(stderr, "warning: no PV names on stdin\n");

    /* Block the ending signals before any thread exists, so that all threads (libca's too) inherit
       the mask and only sigtimedwait below sees them. */
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals, NULL);

    ensure_repeater();

    struct context *contexts = calloc((size_t)n_contexts, sizeof *contexts);
    if (!contexts)
        return 1;
    int started = 0;
    for (int c = 0; c < n_contexts; c++) {
        struct context *ctx = &contexts[c];
        ctx->index = c;
        ctx->channels = calloc((size_t)n_names + 1, sizeof *ctx->channels);
        ctx->subscriptions = calloc((size_t)n_names + 1, sizeof *ctx->subscriptions);
        if (!ctx->channels || !ctx->subscriptions || pthread_create(&ctx->thread, NULL, run_context, ctx) != 0) {
            fprintf(stderr, "could not start context %d\n", c);
            break;
        }
        started++;
    }

    /* Wait until every context has subscribed, looking for SIGTERM in between. */
    int interrupted = 0;
    double setup_start = now();
    pthread_mutex_lock(&lock);
    while (n_ready < started && !interrupted) {
        pthread_mutex_unlock(&lock);
        interrupted = wait_for_signal(&signals, 0.02);
        pthread_mutex_lock(&lock);
    }
    pthread_mutex_unlock(&lock);
    if (interrupted) {
        __atomic_store_n(&stop_flag, 1, __ATOMIC_RELAXED);
        fprintf(stderr, "interrupted while connecting, after %.2f s\n", now() - setup_start);
    } else {
        fprintf(stderr, "%d contexts subscribed to %d PVs in %.2f s\n", started, n_names, now() - setup_start);
    }

    unsigned long *before = calloc((size_t)n_contexts, sizeof *before);
    unsigned long *after = calloc((size_t)n_contexts, sizeof *after);
    double start = now();
    for (int c = 0; c < started; c++)
        before[c] = __atomic_load_n(&contexts[c].events, __ATOMIC_RELAXED);
    int cut_short = !interrupted && wait_for_signal(&signals, seconds);
    for (int c = 0; c < started; c++)
        after[c] = __atomic_load_n(&contexts[c].events, __ATOMIC_RELAXED);
    double elapsed = now() - start;
    if (cut_short)
        fprintf(stderr, "interrupted after %.2f s of the run\n", elapsed);

    pthread_mutex_lock(&lock);
    stopping = 1;
    __atomic_store_n(&stop_flag, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    for (int c = 0; c < started; c++)
        pthread_join(contexts[c].thread, NULL);

    int min_connected = started < n_contexts ? 0 : n_names;
    unsigned long total = 0;
    for (int c = 0; c < started; c++) {
        int connected = contexts[c].failed ? 0 : contexts[c].connected;
        if (connected < min_connected)
            min_connected = connected;
        total += after[c] - before[c];
    }
    double rate_divisor = elapsed > 0 ? elapsed : 1.0;
    printf("{\"contexts\": %d, \"pvs\": %d, \"connected\": %d, \"seconds\": %.6f, \"events\": %lu, "
           "\"events_per_s\": %.1f, \"per_context_per_s\": [",
           n_contexts, n_names, min_connected, elapsed, total, (double)total / rate_divisor);
    for (int c = 0; c < n_contexts; c++) {
        double rate = c < started ? (double)(after[c] - before[c]) / rate_divisor : 0.0;
        printf("%s%.1f", c ? ", " : "", rate);
    }
    printf("]}\n");
    fflush(stdout);

    for (int c = 0; c < n_contexts; c++) {
        free(contexts[c].channels);
        free(contexts[c].subscriptions);
    }
    for (int i = 0; i < n_names; i++)
        free(names[i]);
    free(names);
    free(contexts);
    free(before);
    free(after);
    if (started < n_contexts)
        return 1;
    return min_connected < n_names ? 2 : 0;
}
