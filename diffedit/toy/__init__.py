"""The embedded toy world: scenes with exact ground truth (world), the judge, the trained model (the evaluation
harness that uses them is diffedit/evaluation.py, above both this package and the sweep)."""
from __future__ import annotations

from pathlib import Path

TOY_MODEL = Path(__file__).parent / "toy.safetensors"  # what the model name "toy" loads


def model_world(model: str):
    """The ``world.WorldSpec`` a toy model was trained in: its metadata's "recipe" key "world" ("toy": the shipped
    file); ``world.V1`` for a model without one (older toy files, any other model or source)."""
    import json

    from safetensors import safe_open

    from .world import V1, WORLDS
    path = TOY_MODEL if model == "toy" else Path(model).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return V1
    with safe_open(str(path), "np") as f:
        recipe = json.loads((f.metadata() or {}).get("recipe", "{}"))
    name = recipe.get("world", V1.name)
    if name not in WORLDS:
        raise ValueError(f"{model}: its recipe names toy world {name!r}, not one of {', '.join(WORLDS)}")
    return WORLDS[name]


def resolve_world(name: str | None, model: str):
    """The toy world called ``name`` (a key of ``world.WORLDS``), or for None the one ``model`` was trained in
    (``model_world``); a ValueError names the command-line flag at fault."""
    from .world import WORLDS
    if name is None:
        try:
            return model_world(model)
        except ValueError as e:
            raise ValueError(f"--model {e}") from None
    if name not in WORLDS:
        raise ValueError(f"--world: {name!r} is not a toy world ({', '.join(WORLDS)})")
    return WORLDS[name]
