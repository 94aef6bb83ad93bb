"""torch.compile path: fences and opaque attention (ops.py), the SP graph pass (sp_pass.py),
the backend that runs it before Inductor (backend.py), a rank's compiled forward (runner.py)."""
