"""Black-box suites: the gateway as a process or a whole app, end to end."""
