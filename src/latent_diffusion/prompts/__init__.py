"""The web UI's prompt language (emphasis, BREAK, editing, extra-network tags) and its encoding into the
conditioning mapping."""
