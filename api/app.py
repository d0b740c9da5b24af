"""What Gunicorn loads (`api.app:app`): the app, built in each worker after fork."""

from api import create_app

app = create_app()
