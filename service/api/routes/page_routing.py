"""The routing page of a run: `/runs/{id}/routing?layer=` (an E layer: tokens per expert
over steps, rates, MaxVio, losses, dead experts; `all`: every layer's drop rate and MaxVio),
its data at `/ui/data/runs/{id}/routing?layer=`. Without `layer`, the run's first E layer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import routing as figures
from service.api import pagekit
from service.api.deps import RunIdPath, SessionDep
from service.services import routing_view, runs
from trainer_hooks.records import MAX_RANK

router = APIRouter(include_in_schema=False)

LayerQuery = Annotated[
    str | None,
    Query(max_length=12, description="an E layer number (0, 1, ...) or 'all' for every layer"),
]
RankQuery = Annotated[int, Query(ge=0, le=MAX_RANK, description="whose routing records")]


def _choose(
    session: Any, run_id: str, layer: str | None, rank: int
) -> tuple[int | None, dict[str, Any]]:
    """(the layer shown: an E layer, or None for the overview; the run's layers). A bad
    `layer` is a 422, one the run lacks a 404, both naming it; a run without routing shows
    why, whatever the layer asked."""
    wanted = routing_view.parse_layer(layer)
    found = routing_view.layers_of(session, run_id, rank)
    layers = found["layers"]
    if not layers:
        return None, found
    if wanted == -1:
        return layers[0], found
    if wanted is not None:
        routing_view.check_layer(wanted, layers)
    return wanted, found


def _layer_names(plan: dict[str, Any], layers: list[int]) -> list[tuple[int, str]]:
    """Each E layer's option text, with its place in the model when the plan says."""
    positions = plan.get("e_positions")
    names = []
    for n in layers:
        at = positions[n] if isinstance(positions, list) and n < len(positions) else None
        names.append((n, f"layer {n}" + (f" (model layer {at})" if isinstance(at, int) else "")))
    return names


@router.get("/runs/{run_id}/routing", response_class=HTMLResponse)
def routing_page(
    request: Request,
    session: SessionDep,
    run_id: RunIdPath,
    layer: LayerQuery = None,
    rank: RankQuery = 0,
) -> HTMLResponse:
    run = runs.get_run(session, run_id)
    shown, found = _choose(session, run_id, layer, rank)
    return pagekit.html(
        request,
        "routing.html",
        page="routing",
        title=f"routing · {run.name}",
        run=pagekit.run_header(run),
        data_url=pagekit.data_url(
            request,
            f"/runs/{run_id}/routing",
            layer="all" if shown is None else shown,
            rank=rank or None,
        ),
        layers=_layer_names(run.model_plan, found["layers"]),
        layer=shown,
        rank=rank,
        reason=found["reason"],
    )


@router.get(pagekit.UI_DATA + "/runs/{run_id}/routing")
def routing_data(
    session: SessionDep, run_id: RunIdPath, layer: LayerQuery = None, rank: RankQuery = 0
) -> Response:
    run = runs.get_run(session, run_id)
    shown, found = _choose(session, run_id, layer, rank)
    ends = {a.attempt: a.status for a in run.attempts if a.rank == 0}
    body: dict[str, Any] = {**pagekit.live_fields(run.status), "layers": found["layers"]}
    if found["reason"]:
        return pagekit.data({**body, "texts": {"routing-empty": found["reason"]}})
    if shown is None:
        series = routing_view.overview(session, run_id, rank)
        return pagekit.data(
            {
                **body,
                "figures": {
                    "drop_all": figures.overview_figure(
                        series, "drop_rate", "Drop rate per E layer", "%", ends
                    ),
                    "vio_all": figures.overview_figure(
                        series, "max_vio", "MaxVio per E layer", "max / mean − 1", ends
                    ),
                },
                "tables": {"layers-table": figures.overview_table(series, "")},
            }
        )
    view = routing_view.layer_view(session, run_id, shown, rank)
    return pagekit.data(
        {
            **body,
            "figures": {
                "heatmap": figures.tokens_heatmap(view, ends),
                "rates": figures.rates_figure(view, ends),
                "max_vio": figures.max_vio_figure(view, ends),
                "losses": figures.losses_figure(view, ends),
            },
            "tables": {"experts-table": figures.experts_table(view)},
            "texts": figures.layer_texts(view),
        }
    )
