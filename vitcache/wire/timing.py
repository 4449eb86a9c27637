"""A video result's timing: what a caller needs to place its temporal groups (M-RoPE time steps,
timestamps). It travels in stored values, gRPC results and shared-memory frames alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoTiming:
    """Where a video's temporal groups sit in time (a group is ``temporal_patch_size`` frames)."""

    frames: int  # frames sampled (before padding to a multiple of temporal_patch_size)
    sampled_fps: float  # frames per second of the sampled frames
    second_per_grid_ts: float  # Qwen2.5-VL's M-RoPE time step: temporal_patch_size / sampled_fps
    timestamps: tuple[float, ...]  # Qwen3-VL's: seconds at the middle of each group (first and last frame)

    def to_json(self) -> dict:
        return {"frames": self.frames, "sampled_fps": self.sampled_fps, "second_per_grid_ts": self.second_per_grid_ts,
                "timestamps": list(self.timestamps)}  # fmt: skip

    @classmethod
    def from_json(cls, value: dict) -> VideoTiming:
        seconds = tuple(float(s) for s in value["timestamps"])
        return cls(int(value["frames"]), float(value["sampled_fps"]), float(value["second_per_grid_ts"]), seconds)
