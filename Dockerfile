# The twin in a container, installed with the README's own steps (README, "Container").
#   docker build -t twinioc .
#   docker run --rm -p 5064:5064/tcp -p 5064:5064/udp -p 5065:5065/udp -p 5075:5075/tcp -p 5076:5076/udp twinioc
#   docker run --rm ...same ports... twinioc --machine mls
# CI cannot build this (no Docker engine): .ci/container_steps.py reads this file and runs its
# install, start and health-check steps in a fresh virtual environment instead.
FROM python:3.11-slim

# What the README assumes on a fresh machine: Python 3.11+ and make (git is not needed to install).
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 twin

USER twin
WORKDIR /home/twin/twinioc
COPY --chown=twin:twin . .
RUN make install

# Inside the container its own network namespace isolates the twin, so it serves on all of the
# container's interfaces. The client settings stay EPICS's defaults: the twin's check for a real
# machine (its sentinel search) broadcasts with them. Setpoints, journal and snapshots live in the
# volume, in a folder per machine (var/bessy2, var/mls).
ENV PATH=/home/twin/twinioc/.venv/bin:$PATH
RUN mkdir -p var
VOLUME /home/twin/twinioc/var
# CA server (tcp, and udp name searches), CA repeater, PVA server (tcp), PVA searches (udp). The
# measurement service runs from the same image on a port of your choosing, with a token off loopback:
# `docker run -p 8080:8080 --entrypoint twinioc twinioc web --machine mls --bind 0.0.0.0 --token T`,
# its dashboard at http://host:8080/ (every file it loads comes from the service: no internet needed).
EXPOSE 5064/tcp 5064/udp 5065/udp 5075/tcp 5076/udp

# Healthy: a Channel Access read of the publication counter answers, over loopback only.
HEALTHCHECK --interval=10s --timeout=8s --start-period=30s --retries=3 \
    CMD EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO twinioc get -w 5 TWIN:UPDATES

# The machine is the argument: `docker run ... twinioc --machine mls` (any other twinioc option
# goes the same way). A shell in the container reads and writes PVs with `twinioc get|put|monitor`.
ENTRYPOINT ["twinioc", "--bind", "0.0.0.0"]
CMD ["--machine", "bessy2"]
