"""Reads of device values that leave the GPU's queue alone."""

from __future__ import annotations

import time

import pytest
import torch

from cocoinr_nerfstudio.model_components.host_reads import DeferredRead, copy_to_device, copy_to_host


def test_copy_to_host_of_a_host_tensor_is_the_tensor():
    values = torch.tensor([0.5, 2.0])
    host, copied = copy_to_host(values)
    assert host is values and copied is None


def test_a_deferred_read_holds_the_values_as_of_when_it_was_made():
    values = torch.tensor([1.0, 2.0])
    read = DeferredRead(values)
    assert read.result().tolist() == [1.0, 2.0]
    values.mul_(3)  # changed in place after the read was made (a count reset)
    assert read.result().tolist() == [1.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_to_host_of_a_cuda_tensor_arrives_in_pinned_memory():
    host, copied = copy_to_host(torch.tensor([0.5, 2.0], device="cuda"))
    copied.synchronize()
    assert host.is_pinned() and host.tolist() == [0.5, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_deferred_read_waits_for_the_work_before_it_not_after():
    values = torch.arange(4.0, device="cuda")
    torch.cuda.synchronize()
    read = DeferredRead(values)
    values.mul_(3)  # queued after the copy: not in what it holds
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued after the copy
    start = time.perf_counter()
    assert read.result().tolist() == [0.0, 1.0, 2.0, 3.0]
    waited = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy and waited < 0.2


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_copy_to_device_arrives_in_queue_order(device):
    host = torch.tensor([1.0, 2.0])
    copied = copy_to_device(host, device)
    assert copied.device.type == device and (copied * 2).tolist() == [2.0, 4.0]
    assert host.tolist() == [1.0, 2.0]
