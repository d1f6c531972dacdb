"""The .momos file: `header` (its records and validation, and `inspect`, torch-free) and `format` (`save`, `load`).

Format: docs/format.md.
"""
