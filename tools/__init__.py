"""Command-line helpers: benchmarks and report rendering."""
