# The edgebuild build environment: CPU torch by default.
#   docker build -t edgebuild .
#   docker run --rm -v "$PWD:/work" -w /work edgebuild build examples/digits/edgebuild.yaml
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git cmake g++ make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgebuild
COPY pyproject.toml constraints.txt README.md ./
COPY edgebuild ./edgebuild
COPY targets ./targets
COPY templates ./templates
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt '.[hf]'
ENTRYPOINT ["edgebuild"]
