"""Small helpers shared by routes and services."""
