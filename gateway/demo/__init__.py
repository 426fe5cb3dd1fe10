"""The offline showcase: a simulated cloud, a narrow task, traffic, and the route adapting."""
