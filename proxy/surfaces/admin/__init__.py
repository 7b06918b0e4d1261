"""The admin HTTP API: the CLI's operations over JSON, behind `Authorization: Bearer $SPENDGATE_ADMIN_TOKEN`.

Without an admin token configured, every `/admin` path answers 404: the API does not exist.
Errors use Anthropic's error shape, like every other answer spendgate makes itself.

`routes` guards and mounts the routes that `teams` and `usage` declare; `openapi` describes them; `requests` is
what every handler shares.
"""
