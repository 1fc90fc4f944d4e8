"""The ForceCommand session wrapper (issue 3): records interactive sessions, passes
non-interactive ones through. Not built yet; nothing imports this package."""
