"""The web page: the archive's search and message view for users, and admin pages
for administrators (an ASGI application; docs/archive.md)."""
