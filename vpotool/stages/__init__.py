"""Stage functions: each takes a resolved config, reads and writes files, and returns the path it wrote."""
