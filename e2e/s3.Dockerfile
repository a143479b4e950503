# The in-cluster S3 of the kind e2e suite: the Cistern image plus moto's server, run as
#   python -m cistern.testing.s3server --host 0.0.0.0 --port 5000
# Built by e2e/test_kind.py with --build-arg BASE=<the freshly built Cistern image>.
ARG BASE=cistern:e2e
FROM ${BASE}
RUN pip install --no-cache-dir "moto[server]==5.2.5"
EXPOSE 5000
CMD ["python", "-m", "cistern.testing.s3server", "--host", "0.0.0.0", "--port", "5000"]
