"""Pure calculators: data in, data out. No SQLAlchemy, no FastAPI, no callbacks that query."""
