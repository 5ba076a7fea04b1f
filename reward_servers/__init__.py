"""Reward models and their Ray Serve deployments: the reward protocol and registry, built-in models
(toy-align, ImageReward, HPSv2, PickScore), dynamic batching, and gradient mode (d score / d image).

Not built yet: see issue 5. The toy world's reward, `toy-align`, already implements the protocol's
`score(images, prompts)` in `dmdr_rl.toy.classifier.AlignReward`.
"""
