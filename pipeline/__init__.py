"""The canny2image pipeline: preprocessing, prompt encoding, the runtime behind the hackathon interface."""
