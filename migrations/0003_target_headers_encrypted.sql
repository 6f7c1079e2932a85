-- A target's custom headers are credentials of the tenant's receiver
-- (Authorization: Bearer …): they are stored like secrets, as one AES-GCM
-- ciphertext of their JSON bound to the target (relay/crypto.py seal_headers).
-- NULL: no custom headers.
ALTER TABLE targets ADD COLUMN headers_enc bytea;

-- The key is not available to SQL: right after this file, in the same
-- transaction, `relay migrate` encrypts every existing row's plaintext
-- headers into headers_enc and drops the plaintext column
-- (relay/store/migrations.py, _encrypt_target_headers).
