"""Guest side: the root image, QEMU, a booted guest, SSH to it, its console, dm-flakey."""
