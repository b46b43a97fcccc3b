"""What a budget hold prices a request at: the priciest deployment it may end up on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.catalogue import Catalogue, Deployment, ModelEntry, Rates
    from gateway.context import Usage

#: Distinct model entries priced; past this the memo starts again (tests build many gateways).
_MAX_ENTRIES = 4096


class HoldPrices:
    """Per model entry, the highest input (plain, cached or cache-write) and output prices
    among the deployments a request for it may end up on (``may_serve``), remembered by the
    entry's id."""

    def __init__(self, catalogue: Catalogue | None = None, rules: Any = ()) -> None:
        self.catalogue = catalogue
        #: The routing rules' targets: (model or None, deployment ids).
        self.rule_targets: tuple[tuple[str | None, tuple[str, ...]], ...] = tuple(
            (r.model, tuple(r.deployments)) for r in rules
        )
        self._memo: dict[int, tuple[object, float, float]] = {}
        self._rates: dict[int, tuple[Deployment, Rates]] = {}

    def cost(self, dep: Deployment, usage: Usage) -> float:
        """What ``usage`` costs on ``dep``: ``dep.price.cost_of(usage)`` spelt out (two calls
        fewer on every settlement), with the deployment's rates resolved once (they are read
        from pydantic models)."""
        known = self._rates.get(id(dep))
        if known is None or known[0] is not dep:
            if len(self._rates) >= _MAX_ENTRIES:
                self._rates.clear()
            known = self._rates[id(dep)] = (dep, dep.price.rates)
        plain, cached, write, write_1h, output = known[1]
        hits, writes, writes_1h = (
            usage.cached_tokens,
            usage.cache_write_tokens,
            usage.cache_write_1h_tokens,
        )
        # Rates.cost's sum, term for term in its order (so the same float).
        return (
            (usage.prompt_tokens - hits - writes) * plain
            + hits * cached
            + (writes - writes_1h) * write
            + writes_1h * write_1h
            + usage.completion_tokens * output
        ) / 1e6

    def worst_cost(self, entry: ModelEntry, prompt: int, cap: int) -> float:
        """``prompt`` and ``cap`` tokens at those highest prices, in USD."""
        prices = self._memo.get(id(entry))
        if prices is None or prices[0] is not entry:
            if len(self._memo) >= _MAX_ENTRIES:
                self._memo.clear()
            deps = self.may_serve(entry)
            prices = self._memo[id(entry)] = (
                entry,
                # A prompt may be all cache writes (priced above plain input): the highest.
                max([d.price.max_input_rate for d in deps], default=0.0),
                max([d.price.output_per_mtok for d in deps], default=0.0),
            )
        return (prompt * prices[1] + cap * prices[2]) / 1e6

    def may_serve(self, entry: ModelEntry) -> list[Deployment]:
        """The deployments a request for ``entry`` may end up on: its own, its fallbacks' (and
        theirs), and every routing rule's target model (with its fallbacks) and deployments,
        whatever the rules' conditions: a hold must cover the priciest of them."""
        catalogue = self.catalogue
        if catalogue is None:
            return list(entry.deployments)
        out: list[Deployment] = []
        seen: set[str] = set()
        queue: list[str] = [entry.name, *(m for m, _ in self.rule_targets if m)]
        while queue:
            model = catalogue.get(queue.pop(0))
            if model is None or model.name in seen:
                continue
            seen.add(model.name)
            out.extend(model.deployments)
            queue.extend(model.fallbacks)
        wanted = {d for _, deps in self.rule_targets for d in deps}
        if wanted:
            out.extend(d for d in catalogue.deployments() if d.id in wanted)
        return out
