"""Harnesses maintainers run: benchmarks (bench), the GPU check (gpu_check), the planted-bug check
(mutation_check) and the full-size parity checks (check_full_size). Users' tools are one folder up."""
