"""Business logic. Nothing in this package imports Flask: routes call in, services answer."""
