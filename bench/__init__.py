"""srdit's benchmarks and its GPU evidence counted on the CPU. Each file is a script
(`python bench/throughput.py ...`) and a module of this package (`from bench import traffic`, as
the tests import them): run as a script, a file first puts the repository root on sys.path, so
that `bench.common` and `srdit` resolve the same way in both cases."""
