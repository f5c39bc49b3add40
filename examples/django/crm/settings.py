"""Settings of the example project: one app (leads) whose tables live in the same
PostgreSQL database as the outbox (schema `outbox`, created by `outbox-relay migrate`).

The database comes from DATABASE_URL, the same variable the relay reads, so both point at
the same database: postgres://USER[:PASSWORD]@HOST[:PORT]/NAME.
"""
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

# An example, not a deployment: a fixed key and DEBUG on. Use your own settings.
SECRET_KEY = "outbox-relay-example-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "leads",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "crm.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Written to outbox.events.source_service by outbox.publish() unless a call names another.
OUTBOX_SOURCE_SERVICE = "django-crm"


def _database_from_url(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DATABASE_URL must be a postgres:// URL, not {parts.scheme}://")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


DATABASES = {
    "default": _database_from_url(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/outbox_django_example")
    )
}
