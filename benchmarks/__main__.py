"""``make bench``: every benchmark, each comparing figures measured side by side in one run."""

from __future__ import annotations

from benchmarks import constrained, engine, router_overhead, stack_load


def main() -> None:
    r = router_overhead.run()
    print(
        f"router overhead: {r['median_tokens_per_s']:.0f} generated tokens/s across {r['streams']:.0f} streams "
        "with an instant shard (median of 3; target >= 20000)",
        flush=True,
    )
    print(engine.report(engine.run()), flush=True)
    print(constrained.report(constrained.run()), flush=True)
    print(stack_load.report(stack_load.run()), flush=True)


if __name__ == "__main__":
    main()
