# spendgate: metering proxy for Anthropic's Messages API.
# Build: docker build -t spendgate .   (or: docker compose up --build)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --home-dir /home/spendgate --shell /usr/sbin/nologin spendgate \
    && mkdir -p /var/lib/spendgate/spill && chown spendgate: /var/lib/spendgate/spill

USER spendgate
WORKDIR /home/spendgate

EXPOSE 8080
# `spendgate serve` applies pending database migrations before it starts listening.
CMD ["spendgate", "serve", "--host", "0.0.0.0", "--port", "8080"]
