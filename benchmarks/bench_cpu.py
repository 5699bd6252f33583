"""CPU benchmark: the same as `mmrec bench`, whose code (mm_rec/cli/bench.py) it runs.

    python benchmarks/bench_cpu.py [--batch 8] [--seq 256] [--steps 10] [--threads 2] [--config RECIPE]
"""

from mm_rec.cli.bench import main

if __name__ == "__main__":
    main()
