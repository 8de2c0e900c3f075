"""pocketembed.daemon: the long-lived process and what it runs (engine, models)."""
