"""Plain functions that the routes and the dashboards call: they open units of work, read the
store, run the calculators and return wire models. No FastAPI here."""
