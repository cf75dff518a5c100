# The project image: workers, Flower, the emulator and the CLI share it.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 lipsync && mkdir /data && chown lipsync /data
WORKDIR /app

# Dependencies first, in their own layer: code changes do not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p config producers workers lipsync emulator \
 && for p in config producers workers lipsync emulator; do touch $p/__init__.py; done \
 && pip install '.[local]' && pip uninstall -y lipsync-pipeline \
 && rm -rf config producers workers lipsync emulator

COPY config ./config
COPY producers ./producers
COPY workers ./workers
COPY lipsync ./lipsync
COPY emulator ./emulator
RUN pip install --no-deps . && rm -rf /root/.cache

USER lipsync
ENV LIPSYNC_WORK_DIR=/tmp
ENTRYPOINT ["lipsync"]
CMD ["--help"]
