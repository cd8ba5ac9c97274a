"""``make bench``: every benchmark, each comparing figures measured side by side in one run."""

from __future__ import annotations

from benchmarks import (
    activation_accuracy,
    constrained,
    draft,
    engine,
    engine_workload,
    lora,
    placement,
    router_overhead,
    served,
    speculation,
)


def main() -> None:
    r = router_overhead.run()
    print(
        f"router overhead: {r['median_tokens_per_s']:.0f} generated tokens/s across {r['streams']:.0f} streams "
        "with an instant shard (median of 3; target >= 20000)",
        flush=True,
    )
    print(placement.report(placement.run()), flush=True)
    engines = engine.run()
    print(engine.report(engines), flush=True)
    print(constrained.report(constrained.run()), flush=True)
    print(activation_accuracy.report(activation_accuracy.run()), flush=True)
    # The shared workload through make serve, set against the engine alone on the same workload
    # and against the engine's decode, all of this same run.
    alone = engine_workload.run()
    stack = served.run()
    print(served.report(stack, engines["after"], engines["cpu"], alone), flush=True)  # type: ignore[arg-type]
    print(speculation.report(speculation.run(), str(engines["cpu"])), flush=True)
    print(draft.report(draft.run(), str(engines["cpu"])), flush=True)
    print(lora.rank_report(lora.rank_cost(), str(engines["cpu"])), flush=True)
    print(lora.report(lora.run(), str(engines["cpu"])), flush=True)


if __name__ == "__main__":
    main()
