"""Orchestration: sweep presets and their validation (``presets``), the Tune trial (``trial``), the Tune sweep
(``sweep``), MLflow tracking (``tracking``) and results tables and curves (``analysis``).  Ray, Tune and MLflow are
imported inside the functions that need them, so presets validate a command line before any of them starts."""
