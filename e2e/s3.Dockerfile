# The in-cluster S3 of the kind e2e suite: the Cistern image plus moto's server and the tests'
# S3 wrapper (tests/support, which the product image does not ship), run as
#   python -m support.s3server --host 0.0.0.0 --port 5000
# Built by e2e/test_kind.py with the tests/ folder as context and --build-arg BASE=<the freshly
# built Cistern image>.
ARG BASE=cistern:e2e
FROM ${BASE}
RUN pip install --no-cache-dir "moto[server]==5.2.5"
COPY support /opt/cistern-tests/support
ENV PYTHONPATH=/opt/cistern-tests
EXPOSE 5000
CMD ["python", "-m", "support.s3server", "--host", "0.0.0.0", "--port", "5000"]
