"""The stax benchmark: `python -m loadtests.bench [--quick]`. See loadtests/README.md."""
