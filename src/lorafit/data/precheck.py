"""The data checks that need neither a tokenizer nor torch: every source is read and every row parsed and put in
its format, with the same errors (file, line, field) the run would give later.

`lorafit config validate` and the start of `lorafit train` call this before anything imports torch, so a data
mistake is reported in about a second instead of after 15-40 s of imports. The run reads the files again when
it tokenises (unless the cache has them): parsing is cheap next to tokenising.
"""

from __future__ import annotations

from lorafit.config import DataConfig
from lorafit.data.sources import read_records


def check_sources(data: DataConfig, *, triplets: bool = False, marker_field: str | None = "marker",
                  preference: bool = False, unpaired: bool = False, prompts: bool = False) -> None:
    """Raise the first source's LorafitError (every bad row of that source listed), or return if all parse.
    ``triplets``/``preference``/``unpaired``/``prompts``: the objective trains on triplet rows, preference pairs, KTO's
    unpaired answers or GRPO's prompts (docs/objectives.md), whatever the sources' format says."""
    from lorafit.data.pairs import read_preference
    from lorafit.data.prompts import read_prompts
    from lorafit.data.triplet_rows import read_triplets
    from lorafit.data.unpaired import read_unpaired

    for source in [*data.train, *data.eval]:
        if preference or source.format == "preference":
            read_preference(source)
        elif unpaired or source.format == "unpaired":
            read_unpaired(source)
        elif prompts or source.format == "prompts":
            read_prompts(source)
        elif triplets or source.format == "triplets":
            read_triplets(source, marker_field=marker_field)
        else:
            read_records(source, rank_field=data.curriculum_field)


def check_config_sources(config) -> None:
    """``check_sources`` with the rows the config's objective reads."""
    kind = config.objective.data_kind
    check_sources(config.data, triplets=kind == "triplets", marker_field=config.eval.attack.marker_field,
                  preference=kind == "preference", unpaired=kind == "unpaired", prompts=kind == "prompts")
