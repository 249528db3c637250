"""Reports: JSON (schema in README), Markdown tables and PNG plots."""
