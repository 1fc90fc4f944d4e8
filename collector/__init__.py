"""The central collector service (issue 5). Not built yet."""
