//! Contacts: one name per peer and one peer per name, the same in memory (by peer id) and on
//! disk (`K/<peer>` in the store). Adding a name or a peer that is already taken is refused with
//! what to do instead; renaming and removing are explicit.

use libp2p::PeerId;

use crate::core::store::{Batch, Contact};
use crate::core::{ContactView, Node, NodeError};

/// Longest contact name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// A contact name, trimmed, if it is acceptable: 1 to [`MAX_NAME_BYTES`] bytes with no control
/// or invisible formatting characters (a name is printed on terminals and used on command lines).
pub(crate) fn valid_name(name: &str) -> Result<&str, NodeError> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(NodeError::Invalid(format!(
            "a contact name is 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(crate::text::is_unsafe_char) {
        return Err(NodeError::Invalid(format!(
            "the contact name {name:?} holds control or formatting characters; pick a plain name"
        )));
    }
    Ok(name)
}

impl Node {
    /// Records a contact that `add_contact` checked: new, or the same peer under the same name
    /// again (its addresses change). A name used for another peer, or a peer known under another
    /// name, is refused.
    pub(crate) async fn save_new_contact(&self, contact: &Contact) -> Result<(), NodeError> {
        {
            let mut contacts = self
                .contacts_mirror()
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(known) = contacts.get(&contact.peer_id) {
                if known.name != contact.name {
                    return Err(NodeError::Invalid(format!(
                        "this peer is already your contact {:?}; to call it {:?} run `kith contact rename {} {}`",
                        known.name, contact.name, known.name, contact.name
                    )));
                }
            }
            if let Some(other) = contacts
                .values()
                .find(|c| c.name == contact.name && c.peer_id != contact.peer_id)
            {
                return Err(NodeError::Invalid(format!(
                    "the name {:?} is already used for {}; pick another name, or `kith contact remove {}` first",
                    contact.name, other.peer_id, contact.name
                )));
            }
            // Written while the mirror is held, so that two adds cannot both pass the checks.
            let mut batch = Batch::new();
            batch.put_contact(contact);
            self.store().apply(batch)?;
            contacts.insert(contact.peer_id, contact.clone());
        }
        self.store().flush().await?;
        // A contact is no stranger: its connections leave the newcomers' lane, and its
        // request, if it had one, is accepted.
        self.net().trust(&contact.peer_id);
        self.plugins().gate.accepted(self, &contact.peer_id).await?;
        self.plugins()
            .rooms
            .contact_added(self, &contact.peer_id)
            .await?;
        Ok(())
    }

    /// Removes the contact called `name`. Its conversation stays.
    pub async fn remove_contact(&self, name: &str) -> Result<ContactView, NodeError> {
        let removed = {
            let mut contacts = self
                .contacts_mirror()
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let peer = named(&contacts, name)?;
            let mut batch = Batch::new();
            batch.remove_contact(&peer);
            self.store().apply(batch)?;
            contacts.remove(&peer)
        };
        self.store().flush().await?;
        self.plugins().presence.wake();
        removed
            .map(Into::into)
            .ok_or_else(|| NodeError::UnknownContact(name.to_owned()))
    }

    /// Renames the contact called `old` to `new`.
    pub async fn rename_contact(&self, old: &str, new: &str) -> Result<ContactView, NodeError> {
        let new = valid_name(new)?;
        let renamed = {
            let mut contacts = self
                .contacts_mirror()
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let peer = named(&contacts, old)?;
            if let Some(other) = contacts
                .values()
                .find(|c| c.name == new && c.peer_id != peer)
            {
                return Err(NodeError::Invalid(format!(
                    "the name {new:?} is already used for {}; pick another name",
                    other.peer_id
                )));
            }
            let Some(mut contact) = contacts.get(&peer).cloned() else {
                return Err(NodeError::UnknownContact(old.to_owned()));
            };
            contact.name = new.to_owned();
            let mut batch = Batch::new();
            batch.put_contact(&contact);
            self.store().apply(batch)?;
            contacts.insert(peer, contact.clone());
            contact
        };
        self.store().flush().await?;
        Ok(renamed.into())
    }
}

/// The peer of the contact called `name`.
fn named(
    contacts: &std::collections::HashMap<PeerId, Contact>,
    name: &str,
) -> Result<PeerId, NodeError> {
    contacts
        .values()
        .find(|c| c.name == name.trim())
        .map(|c| c.peer_id)
        .ok_or_else(|| NodeError::UnknownContact(name.to_owned()))
}
