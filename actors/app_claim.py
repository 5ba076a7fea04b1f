"""The claim a run holds on the name of a reward app it starts (see `reward_servers.serve.claim_app`).

A module of its own, with nothing but Ray: each claim is a Ray actor, a process of its own, and one
defined beside the Serve deployment would import torch, Serve and FastAPI with it (about 0.9 GB and
seconds of imports for a process that holds a name)."""

import ray


@ray.remote(num_cpus=0)
class AppClaim:
    """A run's claim on the name of a reward app it starts, held while it serves it. A named actor's name
    is taken once per cluster and namespace, so of two runs that start an app of one name at the same
    time (a sweep's jobs) only one deploys it: the other's serve.run would replace the app in place, and
    each run deletes it when it ends. It lives while the run holds its handle, and dies with the run's
    driver."""

    def __init__(self, owner: str):
        self.owner = owner

    def describe(self) -> str:
        return self.owner
