"""HTTP only: dependencies (deps.py), error answers (errors.py), middleware, tokens
(security.py) and the routes (routes/<area>.py). Routes call services/ and never each other."""
