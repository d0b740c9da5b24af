"""HTTP blueprints, one per concern. Routes parse, call a service and shape the response."""
