"""Built-in reward models with their real loading code (hub name, local path, cache dir) and a
differentiable scoring path; tested offline on tiny random-weight configs of the same classes."""
