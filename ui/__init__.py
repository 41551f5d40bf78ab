"""The web dashboard (`/ui`): server-rendered pages, their login, and the static script and stylesheet that keep
them live from the stats endpoint. See routes.py."""
