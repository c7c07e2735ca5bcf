"""One module per area of the API; each holds its APIRouter and imports no other route module."""
