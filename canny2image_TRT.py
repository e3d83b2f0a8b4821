"""The hackathon's interface: `hackathon().initialize()` then `process(...)`, as in NVIDIA's template.

initialize() takes no arguments (the grader's call) and then reads CNRT_WEIGHTS / CNRT_PROFILE / CNRT_BACKEND /
CNRT_DEVICE; keyword arguments override them. All the work lives in pipeline/.
"""

from pipeline.runtime import Canny2ImageRuntime, RuntimeConfig


class hackathon:  # noqa: N801 - the name is the hackathon's contract
    def initialize(self, weights=None, profile=None, backend=None, device=None, **options):
        self.runtime = Canny2ImageRuntime(
            RuntimeConfig.from_env(weights=weights, profile=profile, backend=backend, device=device, **options))

    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold):
        return self.runtime.process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                                    ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold)
