#!/bin/sh
# Ansible vault password client for the lab inventory: prints the password `make lab-up` generated.
# ansible.cfg (vault_password_file) or ANSIBLE_VAULT_PASSWORD_FILE points here, so a plain
# `ansible-playbook -i inventories/lab site.yml` opens inventories/lab/group_vars/all/vault.yml.
# Without a lab there is nothing to open; a placeholder keeps Ansible from refusing to start.
password_file=${WEFT_LAB_VAULT_PASSWORD_FILE:-/var/lib/weft-lab/vault-password}
if [ -r "$password_file" ]; then
    exec cat "$password_file"
fi
echo "weft-lab-is-not-built"
