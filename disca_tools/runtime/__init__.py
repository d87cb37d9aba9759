"""Runtime services shared by every tool: errors, logging/progress, provenance, outputs, CLI plumbing."""
