"""Thin HTTP routes, one module per resource: parse, call the engine or the state manager, shape the answer."""
