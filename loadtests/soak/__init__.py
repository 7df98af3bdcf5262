"""A bounded soak through a real chain under graph churn: `python -m loadtests.soak [--quick]`.
See loadtests/README.md."""
