# The twin in a container, installed with the README's own steps.
#   docker build -t twinioc .
#   docker run --rm -p 5064:5064/tcp -p 5064:5064/udp -p 5065:5065/udp -p 5075:5075/tcp -p 5076:5076/udp twinioc
#   docker run --rm ... twinioc --machine mls
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 twin
WORKDIR /home/twin/twinioc
COPY --chown=twin:twin . .
USER twin
RUN make install

# Inside the container the network namespace isolates the twin, so it serves on all interfaces.
ENV PATH=/home/twin/twinioc/.venv/bin:$PATH \
    EPICS_CAS_INTF_ADDR_LIST=0.0.0.0 \
    EPICS_PVAS_INTF_ADDR_LIST=0.0.0.0 \
    TWINIOC_STATE=/home/twin/state
EXPOSE 5064/tcp 5064/udp 5065/udp 5075/tcp 5076/udp
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s \
    CMD python -c "import epics, sys; sys.exit(epics.caget('TWIN:UPDATES', timeout=2) is None)"
ENTRYPOINT ["twinioc", "--bind", "0.0.0.0"]
CMD ["--machine", "bessy2"]
